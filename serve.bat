@echo off
rem OmniLoader on Windows: creates (or reuses) .venv, installs, and serves the default model.
rem Extra arguments are passed to `omniloader serve`, e.g.  serve.bat --port 8080
setlocal
cd /d "%~dp0"
if not exist ".venv\Scripts\python.exe" (
    py -3.11 -m venv .venv 2>nul || python -m venv .venv
    if errorlevel 1 (
        echo Could not create a virtual environment: install Python 3.11 from python.org first.
        exit /b 1
    )
)
".venv\Scripts\python.exe" -m pip install --upgrade pip
".venv\Scripts\python.exe" -m pip install -e .
if errorlevel 1 (
    echo Install failed. llama-cpp-python builds from source: install the "Desktop development with C++"
    echo workload of Visual Studio Build Tools, then run serve.bat again.
    exit /b 1
)
".venv\Scripts\omniloader.exe" serve %*
