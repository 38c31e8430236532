"""Policy files: directories, file-name rules, directives, legacy formats, fail-closed loading."""

from __future__ import annotations

import pytest

from qrexec.policy.engine.model import Action
from qrexec.policy.engine.policy import Policy
from qrexec.policy.loading.memory_store import MemoryStore, load_policy_from_files
from qrexec.policy.loading.paths import PolicyPaths
from tests.policy.policy_core_support import evaluate, outcome

RUN = "/run/qubes/policy.d"
ETC = "/etc/qubes/policy.d"
R40 = "/etc/qubes-rpc/policy"
OLD = "/etc/qubes_rpc/policy"
PATHS = PolicyPaths()


def load(files: dict[str, str], dirs: tuple[str, ...] = ()) -> Policy:
    return load_policy_from_files(files, PATHS, dirs)


def decided_by(
    policy: Policy, source: str, target: str, service: str = "test.Svc", argument: str = "+"
) -> str | None:
    res = evaluate(policy, source, target, service, argument)
    return None if res.rule is None else f"{res.rule.path}:{res.rule.lineno}"


# --- file names, merging, order ------------------------------------------------------------


def test_only_regular_policy_files_not_starting_with_dot_count() -> None:
    policy = load(
        {
            f"{ETC}/10-a.policy": "test.Svc * vm1 vm2 deny\n",
            f"{ETC}/.20-hidden.policy": "broken\n",
            f"{ETC}/20-b.policy.rpmnew": "broken\n",
            f"{ETC}/README": "broken\n",
            f"{ETC}/include/x.policy": "broken\n",  # subdirectory: only via !include-dir
        }
    )
    assert policy.error is None
    assert [str(r.ref) for r in policy.rules] == [f"{ETC}/10-a.policy:1"]


@pytest.mark.parametrize(
    "name", ["10-A.policy", "10 a.policy", "10+a.policy", "10-é.policy", "10-a:b.policy"]
)
def test_bad_character_in_a_considered_file_name_denies_everything(name: str) -> None:
    policy = load({f"{ETC}/{name}": "\n", f"{ETC}/50-ok.policy": "* * @anyvm @anyvm allow\n"})
    assert policy.error is not None
    assert policy.error.path == f"{ETC}/{name}"
    assert "file name" in policy.error.reason
    assert evaluate(policy, "vm1", "vm3").action is Action.DENY


def test_bad_character_in_an_ignored_file_name_is_harmless() -> None:
    policy = load(
        {
            f"{ETC}/NOTES.txt": "",
            f"{ETC}/.Hidden.policy": "",
            f"{ETC}/50-ok.policy": "* * @anyvm @anyvm allow\n",
        }
    )
    assert policy.error is None


def test_directories_merged_by_name_first_wins_sorted_in_c_locale() -> None:
    policy = load(
        {
            f"{RUN}/50-same.policy": "test.Svc * vm1 vm2 allow\n",
            f"{ETC}/50-same.policy": "broken line never read\n",
            f"{ETC}/10_b.policy": "test.Svc * vm1 vm3 allow\n",
            f"{RUN}/10-b.policy": "test.Svc * vm1 vm3 deny\n",
            f"{ETC}/10.b.policy": "test.Svc * vm1 vm3 ask\n",
            f"{ETC}/1z.policy": "test.Svc * vm1 tmpl allow\n",
        }
    )
    assert policy.error is None
    # C locale: '-' (0x2d) < '.' (0x2e) < digits < '_' (0x5f) < letters
    assert [r.ref.path for r in policy.rules] == [
        f"{RUN}/10-b.policy",
        f"{ETC}/10.b.policy",
        f"{ETC}/10_b.policy",
        f"{ETC}/1z.policy",
        f"{RUN}/50-same.policy",
    ]
    assert decided_by(policy, "vm1", "vm3") == f"{RUN}/10-b.policy:1"


def test_missing_policy_directory_is_skipped() -> None:
    policy = load({f"{ETC}/10-a.policy": "test.Svc * vm1 vm2 allow\n"})
    assert policy.error is None and len(policy.rules) == 1
    assert RUN in policy.sources and f"{ETC}/10-a.policy" in policy.sources


def test_syntax_error_anywhere_denies_everything() -> None:
    policy = load(
        {
            f"{ETC}/10-a.policy": "* * @anyvm @anyvm allow\n",
            f"{ETC}/90-z.policy": "\n\ntest.Svc * vm1 vm2 alow\n",
        }
    )
    assert policy.error is not None
    assert str(policy.error).startswith(f"{ETC}/90-z.policy:3: ")
    for target in ("vm2", "vm3", "dom0"):
        res = evaluate(policy, "vm1", target)
        assert res.action is Action.DENY and f"{ETC}/90-z.policy:3" in res.reason


# --- !include, !include-dir, !include-service ---------------------------------------------


def test_include_relative_and_absolute() -> None:
    policy = load(
        {
            f"{ETC}/30-a.policy": (
                "!include include/one\n!include /srv/two\ntest.Svc * vm1 @anyvm deny\n"
            ),
            f"{ETC}/include/one": "test.Svc * vm1 vm2 allow\n",
            "/srv/two": "test.Svc * vm1 vm3 allow\n",
        }
    )
    assert policy.error is None
    assert decided_by(policy, "vm1", "vm2") == f"{ETC}/include/one:1"
    assert decided_by(policy, "vm1", "vm3") == "/srv/two:1"
    assert decided_by(policy, "vm1", "tmpl") == f"{ETC}/30-a.policy:3"


def test_include_dir_uses_policy_file_rules() -> None:
    policy = load(
        {
            f"{ETC}/30-a.policy": "!include-dir include.d\n",
            f"{ETC}/include.d/20-b.policy": "test.Svc * vm1 vm3 allow\n",
            f"{ETC}/include.d/10-a.policy": "test.Svc * vm1 vm2 allow\n",
            f"{ETC}/include.d/notes.txt": "broken\n",
        }
    )
    assert policy.error is None
    assert [r.ref.path for r in policy.rules] == [
        f"{ETC}/include.d/10-a.policy",
        f"{ETC}/include.d/20-b.policy",
    ]
    bad = load({f"{ETC}/30-a.policy": "!include-dir inc\n", f"{ETC}/inc/Bad.policy": ""})
    assert bad.error is not None and "file name" in bad.error.reason


def test_include_service_reads_old_syntax() -> None:
    policy = load(
        {
            f"{ETC}/30-a.policy": "!include-service test.Svc * include/test.Svc\n",
            f"{ETC}/include/test.Svc": (
                "# R4.0 syntax\n$tag:tag1 $dispvm allow,user=root\n"
                "vm2 $default allow,target=$dispvm:other-dvm\n"
                "$anyvm $anyvm ask,default_target=vm3\n"
            ),
        }
    )
    assert policy.error is None
    assert outcome(evaluate(policy, "vm1", "@dispvm")) == ("allow", "@dispvm:default-dvm")
    assert evaluate(policy, "vm1", "@dispvm").user == "root"
    assert outcome(evaluate(policy, "vm2", "@default")) == ("allow", "@dispvm:other-dvm")
    res = evaluate(policy, "vm2", "vm3")
    assert res.action is Action.ASK and res.default_target == "vm3"
    assert decided_by(policy, "vm2", "vm3") == f"{ETC}/include/test.Svc:4"
    assert evaluate(policy, "vm1", "vm3", "test.Other").rule is None


@pytest.mark.parametrize(
    ("files", "where"),
    [
        ({f"{ETC}/30-a.policy": "!include missing\n"}, f"{ETC}/30-a.policy:1"),
        ({f"{ETC}/30-a.policy": "!include-dir missing\n"}, f"{ETC}/30-a.policy:1"),
        (
            {
                f"{ETC}/30-a.policy": "!include a\n",
                f"{ETC}/a": "!include b\n",
                f"{ETC}/b": "!include a\n",
            },
            f"{ETC}/a",
        ),
        (
            {
                f"{ETC}/30-a.policy": "!include-service x * inc\n",
                f"{ETC}/inc": "vm1 vm2 allow,bad=1\n",
            },
            f"{ETC}/inc:1",
        ),
        ({f"{ETC}/30-a.policy": "!include inc\n", f"{ETC}/inc": "x * vm1 vm2\n"}, f"{ETC}/inc:1"),
    ],
)
def test_include_errors_deny_everything(files: dict[str, str], where: str) -> None:
    policy = load(files)
    assert policy.error is not None
    assert str(policy.error).startswith(where)


def test_include_loops_and_deep_nesting_are_errors() -> None:
    loop = load({f"{ETC}/30-a.policy": "!include 30-a.policy\n"})
    assert str(loop.error) == f"{ETC}/30-a.policy: include loop"
    chain = {f"{ETC}/inc{n}": f"!include inc{n + 1}\n" for n in range(40)}
    deep = load({f"{ETC}/30-a.policy": "!include inc0\n", **chain})
    assert str(deep.error) == f"{ETC}/inc31: includes nested too deeply"
    legacy = load(
        {
            f"{ETC}/30-a.policy": "!compat-4.0\n",
            f"{R40}/test.Svc": "$include:test.Svc\n",
        }
    )
    assert str(legacy.error) == f"{R40}/test.Svc: include loop"


# --- !compat-4.0 -----------------------------------------------------------------------------


def test_compat_40_reads_legacy_files_with_fall_through() -> None:
    policy = load(
        {
            f"{ETC}/35-compat.policy": "!compat-4.0\n",
            f"{ETC}/90-default.policy": "* * @anyvm @anyvm allow target=tmpl\n",
            f"{R40}/test.Svc": "vm1 vm2 allow\n$include:include/common\n",
            f"{R40}/include/common": "vm1 $dispvm:other-dvm allow\n",
            f"{R40}/test.Svc+arg": "vm1 vm3 allow\n",
            f"{R40}/.hidden": "broken\n",
        }
    )
    assert policy.error is None
    assert decided_by(policy, "vm1", "vm2") == f"{R40}/test.Svc:1"
    assert decided_by(policy, "vm1", "@dispvm:other-dvm") == f"{R40}/include/common:1"
    # SERVICE file without argument: no implicit deny, an unmatched call falls through
    assert outcome(evaluate(policy, "vm3", "vm2")) == ("allow", "tmpl")
    assert decided_by(policy, "vm3", "vm2") == f"{ETC}/90-default.policy:1"
    # SERVICE+ARG file: read before SERVICE, closed by implicit denies (R4.0: it replaced SERVICE)
    assert outcome(evaluate(policy, "vm1", "vm3", argument="+arg")) == ("allow", "vm3")
    res = evaluate(policy, "vm1", "vm2", argument="+arg")
    assert res.action is Action.DENY and res.rule is not None
    assert res.rule.path == f"{ETC}/35-compat.policy" and "implicit" in res.rule.text
    res = evaluate(policy, "vm1", "dom0", argument="+arg")
    assert res.action is Action.DENY and "@adminvm deny" in res.rule.text  # type: ignore[union-attr]
    # the implicit denies name @anyvm sources: dom0 as a source still falls through
    assert outcome(evaluate(policy, "dom0", "vm2", argument="+arg")) == ("deny", None)
    assert decided_by(policy, "dom0", "vm2", argument="+arg") is None


def test_compat_40_without_legacy_dir_loads_nothing() -> None:
    policy = load({f"{ETC}/35-compat.policy": "!compat-4.0\n"})
    assert policy.error is None and policy.rules == ()
    assert R40 in policy.sources


def test_compat_40_syntax_error_in_legacy_file_denies_everything() -> None:
    policy = load({f"{ETC}/35-compat.policy": "!compat-4.0\n", f"{R40}/test.Svc": "vm1 allow\n"})
    assert policy.error is not None and str(policy.error).startswith(f"{R40}/test.Svc:1: ")


# --- the 2011 format -------------------------------------------------------------------------

SEED = {f"{OLD}/test.Add": "# the seed's example\nanyvm anyvm ask\n"}


def test_2011_only_system_uses_the_2011_directory() -> None:
    policy = load(
        {
            **SEED,
            f"{OLD}/test.Copy": "vm1 vm2 allow,user=root\nvm1 dispvm allow\nanyvm dom0 deny\n"
            "dom0 anyvm allow,target=vm3\nvm2 anyvm ask,target=dispvm\n",
        }
    )
    assert policy.error is None
    res = evaluate(policy, "vm1", "vm3", "test.Add")
    assert res.action is Action.ASK and res.rule is not None
    assert str(res.rule) == f"{OLD}/test.Add:2"
    assert outcome(evaluate(policy, "vm1", "dom0", "test.Add")) == ("deny", None)  # anyvm ≠ dom0
    assert outcome(evaluate(policy, "vm1", "vm2", "test.Copy")) == ("allow", "vm2")
    assert evaluate(policy, "vm1", "vm2", "test.Copy").user == "root"
    assert outcome(evaluate(policy, "vm1", "@dispvm", "test.Copy")) == (
        "allow",
        "@dispvm:default-dvm",
    )
    assert decided_by(policy, "vm3", "dom0", "test.Copy") == f"{OLD}/test.Copy:3"
    assert outcome(evaluate(policy, "dom0", "vm2", "test.Copy")) == ("allow", "vm3")
    assert evaluate(policy, "vm2", "vm1", "test.Copy").targets_for_ask == ("@dispvm:other-dvm",)


def test_2011_no_match_names_the_file_and_line_to_add() -> None:
    policy = load(SEED)
    res = evaluate(policy, "vm1", "vm2", "test.Sum")
    assert res.action is Action.DENY
    assert res.reason == (
        "no rule matched; to allow, add the line `vm1 vm2 allow` to /etc/qubes_rpc/policy/"
        "test.Sum (`anyvm anyvm ask` asks every time)"
    )
    assert "`vm1 dom0 allow`" in evaluate(policy, "vm1", "dom0", "test.Sum").reason
    assert "`vm1 dispvm allow`" in evaluate(policy, "vm1", "@dispvm", "test.Sum").reason


def test_2011_directory_ignored_once_policy_d_exists() -> None:
    policy = load(SEED, dirs=(ETC,))
    assert policy.error is None and policy.rules == ()
    assert evaluate(policy, "vm1", "vm2", "test.Add").rule is None


def test_compat_2011_directive_reads_it_inside_policy_d() -> None:
    policy = load(
        {
            **SEED,
            f"{OLD}/test.Copy": "vm1 vm2 allow\n",
            f"{ETC}/35-compat.policy": "!compat-2011\n",
            f"{ETC}/90-default.policy": "* * @anyvm @anyvm deny notify=no\n",
        }
    )
    assert policy.error is None
    assert decided_by(policy, "vm1", "vm3", "test.Add") == f"{OLD}/test.Add:2"
    assert outcome(evaluate(policy, "vm1", "vm2", "test.Copy")) == ("allow", "vm2")
    # like !compat-4.0, a file without argument falls through to later rules
    assert decided_by(policy, "vm3", "vm2", "test.Copy") == f"{ETC}/90-default.policy:1"


@pytest.mark.parametrize(
    "line",
    [
        "vm1 vm2",
        "vm1 vm2 allow extra",
        "$anyvm vm2 allow",
        "vm1 @anyvm allow",
        "vm1 vm2 permit",
        "vm1 vm2 allow,default_target=vm3",
        "vm1 vm2 allow,target=anyvm",
        "vm1 vm2 deny,user=root",
        "vm1 vm2 allow,user",
        "* vm2 allow",
    ],
)
def test_2011_syntax_errors(line: str) -> None:
    policy = load({f"{OLD}/test.Add": f"anyvm anyvm ask\n{line}\n"})
    assert policy.error is not None
    assert str(policy.error).startswith(f"{OLD}/test.Add:2: ")


def test_no_policy_at_all_denies() -> None:
    policy = load({})
    res = evaluate(policy, "vm1", "vm2")
    assert res.action is Action.DENY and "30-user.policy" in res.reason


def test_memory_store_lists_files_and_subdirectories() -> None:
    store = MemoryStore({"/a/b/c.policy": "", "/a/d": ""})
    assert sorted((e.name, e.is_file) for e in store.list_dir("/a")) == [("b", False), ("d", True)]
    assert store.is_dir("/a/b") and not store.is_dir("/a/d")
    with pytest.raises(FileNotFoundError):
        store.read_text("/a/x")
