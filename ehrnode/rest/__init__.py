"""The FHIR R4 REST interface (docs/fhir.md): the consortium for a hospital's own systems,
through the same method table, roles and limits as the JSON-RPC API."""

from .server import FhirServer

__all__ = ["FhirServer"]
