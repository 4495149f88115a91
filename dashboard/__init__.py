"""The Streamlit dashboard: chat with a Llama model, trace its MLP neurons, browse the neuron database.

Run it with ``streamlit run dashboard/app.py``. ``app.py`` holds the page registry;
``state.py`` the shared configuration, model, database and per-session traces;
``ranking.py`` turns a trace into ranked neurons (no Streamlit); ``charts.py`` the Altair
charts; ``highlight.py`` the HTML token highlighting; ``pages/`` the pages.
"""
