"""torchrun ... -m tests.pretrain.kill_during_save ITERATION <launcher flags>: the Echo launcher whose rank 0 is
killed with SIGKILL (kill -9 of its process group) right after the first tensor of iteration ITERATION's
checkpoint is written, so that checkpoint is half written and the tracker file still names the previous one."""

import functools
import os
import signal
import sys

from megatron.core.dist_checkpointing.strategies import filesystem_async

from echo_megatron.pretrain.launcher import main


def kill_mid_write(iteration: int) -> None:
    write_item = filesystem_async._write_item
    directory = f"iter_{iteration:07d}"
    trainer = os.getpid()

    @functools.wraps(write_item)  # Megatron inspects its signature
    def write_then_die(*args, **kwargs):
        result = write_item(*args, **kwargs)
        stream = next(arg for arg in args if hasattr(arg, "flush"))
        if directory in str(getattr(stream, "name", "")) and os.environ.get("RANK", "0") == "0":
            stream.flush()
            # rank 0's whole process group (torchrun starts each rank in its own session): the trainer, the
            # writer Megatron forks for the files, its multiprocessing Manager; torchrun then stops rank 1
            os.killpg(os.getpgid(trainer), signal.SIGKILL)
        return result

    filesystem_async._write_item = write_then_die


if __name__ == "__main__":
    kill_mid_write(int(sys.argv[1]))
    main(sys.argv[2:])
