"""Convert only what pays: per-unit candidates, their measured accuracy damage and latency change on a target,
a cached candidate table, and selection under a latency or accuracy budget by integer linear programming
(``scipy.optimize.milp``). See METHODS.md section 4 (the LANA anchor)."""

from repconv.search.candidates import Candidate, UnitCandidates, assemble_plan, enumerate_candidates
from repconv.search.select import Selection, select

__all__ = ["Candidate", "Selection", "UnitCandidates", "assemble_plan", "enumerate_candidates", "select"]
