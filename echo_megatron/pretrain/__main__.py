"""`torchrun --nproc-per-node N -m echo_megatron.pretrain <flags>`."""

from .launcher import main

if __name__ == "__main__":
    main()
