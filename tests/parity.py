"""The tests' name for the parity budget; it lives in the package (``c3dzoo.testing``) so that
``c3dzoo check`` judges with exactly the same rule."""

from c3dzoo.testing import FLOOR, ambiguous_positions, assert_parity, max_error

__all__ = ["FLOOR", "ambiguous_positions", "assert_parity", "max_error"]
