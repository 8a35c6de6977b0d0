"""A method's named state: non-trainable variables of the wrapper, kept
across steps and saved with the model, that the method's hooks read and
write by name (`{name: value or list of values}`)."""

import keras


class NamedState:
    """The state variables of one wrapper, by name: a single variable, or
    one slot per variable of the wrapped model found by its path (so
    freezing a layer later leaves the other slots in place)."""

    def __init__(self):
        self.slots = {}  # name -> variable, or (like, {path: variable})

    def add(self, model, name, shape=(), dtype="float32", like=None):
        """See `StepEngine.add_state`."""
        if like is None:
            self.slots[name] = _weight(model, shape, dtype, name)
            return
        if like not in ("trainable_variables", "variables"):
            raise ValueError(
                f"`like` must be None, 'trainable_variables' or 'variables'; received {like!r}."
            )
        self.slots[name] = (
            like,
            {
                v.path: _weight(model, v.shape, v.dtype, f"{name}_{i}")
                for i, v in enumerate(getattr(model.inner, like))
                if keras.backend.is_float_dtype(v.dtype)
            },
        )

    def variables(self, model):
        """`{name: variable or list of variables}`, the lists aligned with
        `sources(model, name)`."""
        named = {}
        for name, value in self.slots.items():
            if isinstance(value, keras.Variable):
                named[name] = value
            else:
                named[name] = [value[1][v.path] for v in self.sources(model, name)]
        return named

    def sources(self, model, name):
        """The variables of the wrapped model the slots of `name` mirror."""
        like, slots = self.slots[name]
        if like == "variables":
            return [v for v in model.inner.variables if v.path in slots]
        missing = [v.path for v in model.trainable_variables if v.path not in slots]
        if missing:
            raise ValueError(
                f"{type(model).__name__} keeps state for the variables that were "
                f"trainable when it was built; {missing} became trainable later. "
                "Wrap the model again after changing which layers train."
            )
        return list(model.trainable_variables)

    def positions(self, model):
        """`{name: index or list of indices}` in `model.non_trainable_variables`
        (the values a step reads and writes)."""
        index = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
        return {
            name: index[id(v)] if isinstance(v, keras.Variable) else [index[id(u)] for u in v]
            for name, v in self.variables(model).items()
        }

    @staticmethod
    def read(positions, values):
        """The named state's entries of the non-trainable `values`."""
        return {
            name: values[p] if isinstance(p, int) else [values[i] for i in p]
            for name, p in positions.items()
        }

    @staticmethod
    def write(positions, values, state):
        """`values` with the named `state` written into its entries."""
        values = list(values)
        for name, p in positions.items():
            if isinstance(p, int):
                values[p] = state[name]
            else:
                for i, value in zip(p, state[name]):
                    values[i] = value
        return values


def _weight(model, shape, dtype, name):
    return model.add_weight(
        shape=shape, dtype=dtype, initializer="zeros", trainable=False, autocast=False, name=name
    )
