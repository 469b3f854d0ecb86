"""A small SD1.5-layout pair and helpers to read `deltasvd compress`'s table, shared by the
explorer and UI tests."""

import contextlib
import io
import re

from deltasvd.cli import main
from deltasvd.fixtures import make_pair

HEAD = re.compile(r"^group\s+pieces\s+rank min\s+median\s+max\s+dense\s+MiB\s+rel\.err$")
ROW = re.compile(r"^(\S+)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$")


def small_pair(folder, family="sd15", seed=0):
    return make_pair(folder, family, "small", seed=seed)


def group_rows(text):
    """{group: (pieces, rank min, median, max, dense, MiB, rel.err)} of a printed group table
    (its header must say so: a table in other units is not read as this one)."""
    rows = {}
    lines = text.splitlines()
    assert any(HEAD.match(line.strip()) for line in lines), text
    for line in lines:
        m = ROW.match(line.strip())
        if m:
            g = m.groups()
            rows[g[0]] = (*g[1:7], float(g[7]))
    return rows


def total_mib(text):
    """The total size (MiB) of a printed group table."""
    line = next(x for x in text.splitlines() if x.startswith("total"))
    return float(line.split()[-2])


def cli_compress(base, tuned, out, *rule):
    """`deltasvd compress` in-process; returns what it prints."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["compress", base, tuned, "-o", str(out), *rule]) == 0
    return buf.getvalue()


def assert_same_table(ours, theirs, err_tol=2e-3):
    """Ranks, dense counts and MiB per group equal; relative errors close (ours leaves out the
    fp16 rounding of the factors)."""
    a, b = group_rows(ours), group_rows(theirs)
    assert a and a.keys() == b.keys()
    for g in a:
        assert a[g][:6] == b[g][:6], (g, a[g], b[g])
        assert abs(a[g][6] - b[g][6]) <= err_tol, (g, a[g], b[g])
    assert abs(total_mib(ours) - total_mib(theirs)) <= 0.011
