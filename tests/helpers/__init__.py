"""Shared helpers of the reliability (fault-injection) suite."""
