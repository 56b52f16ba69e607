"""Records: FHIR intake, de-identification, the vault (the institution's private chain) and anchors."""
