"""PAM for authd: a ctypes binding (``binding``), the worker process that runs it
(``worker``) and the asyncio pool of workers the daemon calls (``pool``).

Kept import-free so ``python -m authd.pam.worker`` starts without loading the daemon's
dependencies; import ``authd.pam.pool.PamPool`` and ``authd.pam.binding.PamResult`` directly.
"""
