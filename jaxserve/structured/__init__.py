"""Structured output: constrain a request's tokens to a JSON schema, a regex, a choice or a
grammar, with llguidance computing each step's token mask on the host and the sampler applying
it on the device (docs/structured_output.md)."""
from jaxserve.structured.compiler import GrammarCompiler
from jaxserve.structured.constraint import KINDS, Constraint, strict_objects
from jaxserve.structured.outputs import StructuredOutputs

__all__ = ["Constraint", "GrammarCompiler", "KINDS", "StructuredOutputs", "strict_objects"]
