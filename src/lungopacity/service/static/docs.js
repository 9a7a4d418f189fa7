// Swagger UI for /docs, from the local bundle (no inline script: the CSP allows only 'self').
"use strict";

window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
  // Swagger UI would otherwise send the description to an outside validator.
  validatorUrl: null,
});
