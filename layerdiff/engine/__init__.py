"""Engine stage: budget, one worker pool, pairings cut into items, the passes that fill sums."""
