"""Layer 6, pipeline: the request's stages in order (``stages.Pipeline.handle``),
from identity to forwarding and relaying the answer."""
