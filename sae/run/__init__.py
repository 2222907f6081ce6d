"""A run folder and what a command says: atomic writes, the writer lock, status.json, console lines,
and the hand-off worker that makes a sweep job's probes and figures beside the next job."""
