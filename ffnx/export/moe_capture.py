"""Capture rules for MoE blocks (filled in by the MoE work; see ffnx.export.capture)."""
