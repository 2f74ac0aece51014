"""Selective-scan backends: ``selective_scan`` (reference · chunked · triton) and ``selective_state_update``."""
from .selective_scan import (BACKENDS, selective_scan, selective_scan_chunked, selective_scan_ref,
                             selective_state_update)

__all__ = ["BACKENDS", "selective_scan", "selective_scan_chunked", "selective_scan_ref", "selective_state_update"]
