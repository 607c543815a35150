"""The run stage: setting a run up (setup), the training loop (loop), what it saves (save,
checkpoint), its directory (rundir), devices and processes (devices), and the commands' library
calls: train, resume, eval and predict (inference)."""
