"""The policy command-line programs: lint, explain, graph, exec, legacy conversion, Xen info.

Top of the policy layers: may import every other policy subpackage; nothing imports it but
console-script entry points and tests.
"""
