"""Python glue for the compiled kernels in csrc/, one module per op: allocate outputs, pass data pointers, sizes,
strides and the current stream to dinov3_kernels._C. Imported lazily by the ops."""
