"""fedseg: the code that travels inside every FedRef-Seg FLARE job.

Sites need only nvflare, monai and torch installed; everything else here is shipped with the job.
"""

__version__ = "0.1.0"
