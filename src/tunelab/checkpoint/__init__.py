"""Checkpoints and run directories.

io (the one atomic writer; checkpoint files and their completion markers), resume (`resume=`: identity and the
checked plan), signals (SIGTERM/SIGINT: finish the step, checkpoint, exit 143/130), callback (the Lightning
CheckpointIO plugin and the `Checkpointing` callback), lock (one live job per run directory), rundir (reading
a finished run directory safely).
"""
