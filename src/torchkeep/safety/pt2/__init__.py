"""Vetting a ``torch.export`` archive (``.pt2``) completely before torch reads it.

``torch.export.load`` can unpickle (``weights_only=False``) weights, constants,
opaque and torchbind objects and sample inputs, ``sympy.sympify`` strings,
load AOTInductor shared libraries, and build graphs that call any Python
function; ``.module()`` compiles ``guards_code``. So a ``.pt2`` is read here
first, once, member by member, and only a *rebuilt* archive of the checked
bytes reaches ``torch.export.load``. Where each job lives:

* :mod:`.members`: the layout ``torch.export.save`` writes (stored members only);
* :mod:`.vetter`: the pass over one read of the file (:func:`vet_pt2`, :func:`scan_pt2`);
* :mod:`.walk`: a small schema language; :mod:`.schema`: the program and config documents in it;
* :mod:`.ops`: the operator allowlist (core ATen IR plus reviewed export operators, minus unsafe ones);
* :mod:`.graph`: Python shape-arithmetic nodes (numbers only, bounded bit lengths);
* :mod:`.symexpr`: the grammar and expansion bounds of symbolic expressions;
* :mod:`.rebuild`: :class:`VettedProgram` and the archive :func:`load_vetted` hands to torch.
"""

from __future__ import annotations

from torchkeep.safety.pt2.rebuild import VettedProgram, load_vetted
from torchkeep.safety.pt2.vetter import scan_pt2, vet_pt2

__all__ = ["VettedProgram", "load_vetted", "scan_pt2", "vet_pt2"]
