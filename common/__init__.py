"""fedprefix.common: what both the device and the coordinator need (no networking)."""
