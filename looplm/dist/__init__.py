"""Training beyond one process on torch.distributed: process groups from torchrun's or srun's
environment (world), DDP and FSDP2 wrapping of one training step (parallel), and checkpoints that
any world size can resume (state), sharded on disk through torch.distributed.checkpoint (shards)."""
