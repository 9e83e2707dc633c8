"""Errors with messages meant for the user, not for a traceback reader."""


class GmiError(Exception):
    """Base class: everything gmi raises on bad input carries a clear message."""


class ImageError(GmiError):
    """A query image could not be read."""


class CheckpointError(GmiError):
    """A checkpoint is unreadable or not a Stable Diffusion checkpoint."""


class SpecError(GmiError):
    """A spec file is corrupt, truncated, tampered with or built with other settings."""


class EncoderUnavailable(GmiError):
    """CLIP weights are missing and cannot be downloaded."""


class NoSpecsError(GmiError):
    """Identification was asked for but no usable spec exists."""


class Cancelled(GmiError):
    """The user interrupted a long job; finished work has been saved."""


class InvalidInput(GmiError):
    """A number, name or size outside what gmi accepts (front ends answer 400/422)."""


class NotFound(GmiError):
    """A named file is not among the files gmi may read (front ends answer 404, without the server path)."""


class Busy(GmiError):
    """Another job holds what this one needs (a spec being built, a build while switching)."""


class EncoderLoading(Busy):
    """A read route asked for an encoder that is still loading: answered now ("encoder loading"), never waited on."""
