"""Index limits the Triton kernels share: they address within a tile in int32."""

INT32_LIMIT = 2**31


class IndexOverflowError(ValueError):
    """A launch whose offsets would not fit the kernel's int32 arithmetic. The ``triton`` backend
    catches it and runs the call on the reference backend instead (recorded in ``c3dzoo.fallbacks()``)."""
