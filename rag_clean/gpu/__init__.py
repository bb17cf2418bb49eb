"""Exclusive CUDA devices across processes.

devices: the torch / NVML calls (DeviceBackend, TorchCudaBackend, VramSnapshot)
locks: per-device lock files and holder notes
lease: Lease, LeaseSummary and GpuLeaseManager, the entry point
lease_settings: the RAG_CLEAN_GPU_* / RAG_CLEAN_FORCE_CPU environment
"""
