"""The Gradio front end: figures (pure DataFrame -> plotly) and layout (wiring)."""
