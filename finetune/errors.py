"""Re-export of the project's user-error type (defined in `adapters`, which may not import us)."""

from adapters.errors import MoetuneError

__all__ = ["MoetuneError"]
