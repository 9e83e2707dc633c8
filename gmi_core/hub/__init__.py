"""gmi at model-hub scale: specs built as a Ray job, one generator actor per GPU, into a shared store
(:mod:`gmi_core.hub.build`); the engine serves that store through its two-tier index (:mod:`gmi_core.index`)."""
