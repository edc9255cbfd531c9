"""Huge-page malloc: a program re-executes itself once with glibc.malloc.hugetlb=1 where that helps."""

import json
import os
import subprocess
import sys

from sae_jax import hostmem

# Re-executes (where it helps), then counts the page faults of touching a fresh 64 MiB array.
PROBE = """
import ctypes, json, os, resource, sys
from sae_jax import hostmem
hostmem.reexec_with_hugepages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(64 * 2**20), 1, 64 * 2**20)  # glibc's malloc, as XLA:CPU allocates (numpy madvises itself)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES", ""), "faults": faults, "argv": sys.argv[1:],
                  "active": hostmem.active()}))
"""


def probe(**env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "SAE_JAX_HUGEPAGES")} | env_extra
    out = subprocess.run([sys.executable, "-c", PROBE, "a", "b c"], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout)


def test_reexec_sets_the_tunable_keeps_the_command_and_cuts_page_faults():
    helps = sys.platform == "linux" and hostmem.glibc_supports_hugetlb() and hostmem.thp_available()
    on, off = probe(), probe(SAE_JAX_HUGEPAGES="0")
    assert on["argv"] == off["argv"] == ["a", "b c"]
    assert off["tunables"] == "" and not off["active"]
    assert on["active"] == helps and (hostmem.TUNABLE in on["tunables"]) == helps
    if helps:  # 64 MiB is 16384 pages of 4 KiB, 32 of 2 MiB
        assert off["faults"] >= 16000 and on["faults"] < 2000, (on, off)


def test_reexec_keeps_the_users_other_tunables():
    out = probe(GLIBC_TUNABLES="glibc.malloc.tcache_count=0")
    assert out["tunables"].split(":")[0] == "glibc.malloc.tcache_count=0"
