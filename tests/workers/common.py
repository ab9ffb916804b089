"""What the multi-process test workers share: the reference/compare command line and the failure report."""
import argparse
import sys


def report_failures(failures: list, ok_message: str) -> int:
    """Gather every rank's failures; rank 0 prints them (or ``ok_message``). Returns the exit code."""
    import torch.distributed as dist

    from megatron_zero.parallel import initialize

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, failures)
    all_failures = [f for fs in gathered for f in fs]
    if dist.get_rank() == 0:
        print("\n".join(all_failures) if all_failures else ok_message, flush=True)
    initialize.destroy_parallel()
    return 1 if all_failures else 0


def main(reference, compare) -> None:
    """``--reference OUT`` (a world of one writes the reference) or ``--compare REF`` (under torchrun)."""
    from megatron_zero.parallel import initialize

    p = argparse.ArgumentParser()
    p.add_argument("--reference")
    p.add_argument("--compare")
    a = p.parse_args()
    if a.reference:
        reference(a.reference)
        initialize.destroy_parallel()
        sys.exit(0)
    sys.exit(compare(a.compare))
