"""``IGNORE_INDEX``: the label that no loss or metric counts (torch's ``cross_entropy`` default, and HF's).

The eval loader writes it into its pad rows; ``shearing.metrics`` and the model's loss skip it. It lives
here, below both, so that importing a loader does not import the metrics (and with them Composer).
"""

IGNORE_INDEX = -100
