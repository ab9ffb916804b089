"""Parallel layout: process groups (TP/PP/DP), pipeline partitioning and tensor-parallel (re)sharding."""
