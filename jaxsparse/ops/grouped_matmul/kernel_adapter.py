"""Calling a Pallas grouped-matmul kernel module through the op's internal contract."""

from __future__ import annotations

from types import ModuleType

from jaxsparse.ops.platform import check_kernel_support, interpret_on


class KernelBackend:
    """``grouped_matmul`` / ``transposed_grouped_matmul`` / ``check_support`` over a kernel module."""

    def __init__(self, kernel: ModuleType, platform: str, implementation: str):
        self._kernel, self._platform, self._name = kernel, platform, implementation

    def check_support(self, inner_dim: int, out_dim: int, dtype) -> None:
        """Raises NotImplementedError unless forward and backward (``dx`` swaps the dims) can run."""
        interpret_on(self._platform, self._name)
        check_kernel_support(self._kernel.check_support, self._name, inner_dim, out_dim, dtype)
        check_kernel_support(self._kernel.check_support, self._name, out_dim, inner_dim, dtype)

    def grouped_matmul(self, x, w, group_sizes, *, transpose_rhs: bool):
        return self._kernel.grouped_matmul(x, w, group_sizes, transpose_rhs=transpose_rhs,
                                           interpret=interpret_on(self._platform, self._name))

    def transposed_grouped_matmul(self, x, dy, group_sizes):
        return self._kernel.transposed_grouped_matmul(x, dy, group_sizes,
                                                      interpret=interpret_on(self._platform, self._name))
