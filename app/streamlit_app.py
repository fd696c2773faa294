"""memcore app: paste text, pick rank and threshold, watch every token cross the line."""

import streamlit as st

st.set_page_config(page_title="memcore", page_icon=":material/psychology:", layout="wide")

pages = [
    st.Page("app_pages/memorize.py", title="Memorize", icon=":material/psychology:", default=True),
    st.Page("app_pages/runs.py", title="Runs", icon=":material/history:"),
    st.Page("app_pages/law.py", title="Memory law", icon=":material/functions:"),
]
st.navigation(pages).run()
