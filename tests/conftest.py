import torch

# Every rank of a test world runs one thread (torchrun's OMP_NUM_THREADS=1); the in-process reference does too,
# so both use the same CPU kernels.
torch.set_num_threads(1)
