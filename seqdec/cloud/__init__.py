"""Running seqdec on cloud accelerators (Cloud TPU VMs and pod slices)."""
