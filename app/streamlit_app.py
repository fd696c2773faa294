"""memcore app: paste text, pick rank and threshold, watch every token cross the line."""

from pathlib import Path

import streamlit as st

# a local file: a Material icon as the page icon is fetched from a font CDN, which fails offline
st.set_page_config(page_title="memcore", page_icon=str(Path(__file__).parent / "static" / "favicon.png"), layout="wide")

pages = [
    st.Page("app_pages/memorize.py", title="Memorize", icon=":material/psychology:", default=True),
    st.Page("app_pages/runs.py", title="Runs", icon=":material/history:"),
    st.Page("app_pages/law.py", title="Memory law", icon=":material/functions:"),
]
st.navigation(pages).run()
