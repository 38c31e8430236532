"""Install the copied project into a container image without pip or network.

Run by ``sim/docker/Dockerfile`` as ``python3 install_in_image.py /opt/qrexec-py``:

* a ``.pth`` file puts the source tree on the interpreter's path (every account, every
  environment: services run with a cleaned environment, so PYTHONPATH would not do);
* one executable per console script of ``pyproject.toml`` in /usr/local/bin, bound to this
  interpreter, and its plain scripts (``[tool.setuptools] script-files``: the per-call
  clients) copied there with their ``#!`` line pointed at it, as pip would;
* the seed's command name ``/usr/lib/qubes/qrexec_client_vm`` as a link to qrexec-client-vm;
* the VM default account ``user`` (uid 1000) with its home, written straight into the account
  files (minimal base images have no useradd);
* the qrexec directories of a domain (service and policy directories of every era).

Does nothing else; the domain's own files come from the topology when the container starts.
"""

from __future__ import annotations

import os
import site
import sys
import tomllib
from pathlib import Path

SCRIPT = """#!{python}
import sys
from {module} import {func}
sys.exit({func}())
"""

DIRECTORIES = (
    "/etc/qubes-rpc",
    "/etc/qubes_rpc/policy",
    "/etc/qubes-rpc/policy",
    "/etc/qubes/policy.d",
    "/etc/qubes/rpc-config",
    "/usr/local/etc/qubes-rpc",
    "/usr/lib/qubes",
    "/var/log/qubes",
    "/run/vchan",
)


def add_user(name: str, uid: int) -> None:
    """Append the account unless it exists (passwd, group, shadow)."""
    passwd = Path("/etc/passwd").read_text()
    if any(line.split(":", 1)[0] == name for line in passwd.splitlines()):
        return
    shell = "/bin/bash" if Path("/bin/bash").exists() else "/bin/sh"
    with open("/etc/passwd", "a") as f:
        f.write(f"{name}:x:{uid}:{uid}::/home/{name}:{shell}\n")
    with open("/etc/group", "a") as f:
        f.write(f"{name}:x:{uid}:\n")
    if Path("/etc/shadow").exists():
        with open("/etc/shadow", "a") as f:
            f.write(f"{name}:*:19000:0:99999:7:::\n")
    home = Path("/home") / name
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, uid, uid)


def main() -> int:
    source = Path(sys.argv[1]).resolve()
    site_dir = Path(site.getsitepackages()[0])
    site_dir.mkdir(parents=True, exist_ok=True)
    (site_dir / "qrexec-py.pth").write_text(f"{source}\n")

    data = tomllib.loads((source / "pyproject.toml").read_text())
    project = data["project"]
    bin_dir = Path("/usr/local/bin")
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, target in project.get("scripts", {}).items():
        module, func = target.split(":")
        path = bin_dir / name
        path.write_text(SCRIPT.format(python=sys.executable, module=module, func=func))
        path.chmod(0o755)
    for script in data.get("tool", {}).get("setuptools", {}).get("script-files", []):
        lines = (source / script).read_text().splitlines(keepends=True)
        path = bin_dir / Path(script).name
        path.write_text(f"#!{sys.executable}\n" + "".join(lines[1:]))
        path.chmod(0o755)

    for directory in DIRECTORIES:
        Path(directory).mkdir(parents=True, exist_ok=True)
    alias = Path("/usr/lib/qubes/qrexec_client_vm")
    if not alias.exists():
        alias.symlink_to(bin_dir / "qrexec-client-vm")
    add_user("user", 1000)

    # Fail the build now if the package does not import from the copied tree.
    import importlib

    sys.path.insert(0, str(source))
    importlib.import_module("qrexec.sim.cli")
    print(f"installed qrexec-py from {source} for {sys.executable}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
