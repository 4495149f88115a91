"""The model side: load a Llama, capture and attribute MLP neurons, steer, generate.

Knows nothing of Streamlit or the database; see DESIGN.md for the data flow.
"""
