"""A stand-in for A1111 1.10's `modules` package with only what scripts/deltasvd_tab.py calls
(names and signatures as in A1111's sources; see tests/test_a1111_tab.py)."""
