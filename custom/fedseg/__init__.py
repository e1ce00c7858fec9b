"""fedseg: FedRef-Seg's site trainer, server controllers and the FedRef update.

Installed on every site and on the server (``pip install fedref-seg``); a job names the version it was
built for and both sides refuse a job built for another one (``fedseg.executor``).
"""

__version__ = "0.1.0"
