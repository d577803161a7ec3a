"""The ``field_input`` option shared by the wrapping methods: symmetry-breaking inputs.

A task whose environment breaks a larger symmetry (``nbody_field``: a constant field along e_z
breaks E(3) down to O(2)_z plus translations) types the environment in
``TaskSpec.breaking_inputs`` (``{"field": "1o"}``). Those fields are not in ``spec.inputs``, so
a method built on ``spec`` ignores them: an O(3)-exact method then stays exactly O(3)-equivariant
in X and cannot represent what the field does (the "wrong symmetry").

With ``field_input=True`` the method is built on ``spec.with_breaking_inputs()`` instead: the
field becomes one more typed input, transformed by the method's frames / canonicaliser /
augmentation like every vector input. For an O(3)-equivariant map f(X, E) (jointly:
f(gX, gE) = g f(X, E)) evaluated at the fixed field E = field * e_z, every g with g E = E (here
O(2)_z) gives f(gX, E) = g f(X, E): the model is exactly equivariant under the task's remaining
group (the stabiliser of E) and can still fit the field's effect. The exactness claim
(``common_group(spec.group, method.group)``) is the same with and without it.
"""
from __future__ import annotations

from ...core.spec import TaskSpec


class FieldInputOption:
    """Mixin of the ``field_input`` option (a keyword-only ``__init__`` argument of each method
    using it, stored with ``set_field_input``); ``model_spec`` is the spec the model is built on."""

    field_input: bool = False

    def set_field_input(self, field_input: bool) -> None:
        self.field_input = bool(field_input)
        options = getattr(self, "options", None)
        if isinstance(options, dict):
            options["field_input"] = self.field_input

    def model_spec(self, spec: TaskSpec) -> TaskSpec:
        """``spec`` with its symmetry-breaking fields as typed inputs when ``field_input`` is set
        (``TaskSpec.with_breaking_inputs``); ``spec`` itself otherwise, or when it has none."""
        return spec.with_breaking_inputs() if self.field_input else spec
