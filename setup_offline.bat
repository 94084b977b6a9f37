@echo off
rem my-chatglm2: installs or repairs the packages of the embedded Python (system).
rem Uses the wheels in .\wheels when present (fully offline), else the package index:
rem   setup_offline.bat --index-url https://pypi.tuna.tsinghua.edu.cn/simple
rem Installs the CUDA build of torch when an NVIDIA GPU is present (see --help).
setlocal
cd /d "%~dp0"
set "PYTHONNOUSERSITE=1"
set "PYTHONUTF8=1"
rem The embedded Python: system\python\ (or system\ in earlier bundles); fix_pth.py points its ._pth at
rem the bundle, also for a Python unzipped there by hand.
set "PY=system\python\python.exe"
if not exist "%PY%" set "PY=system\python.exe"
if not exist "%PY%" goto no_python
set "PATH=%CD%\system\python;%CD%\system\python\Scripts;%CD%\system;%CD%\system\Scripts;%PATH%"
"%PY%" -s system\fix_pth.py
"%PY%" -s -m server.setup.install_deps %*
set "RC=%ERRORLEVEL%"
if not defined CHATGLM2_NO_PAUSE pause
exit /b %RC%

:no_python
echo [my-chatglm2] system\python\python.exe is missing: unzip the whole bundle again.
if not defined CHATGLM2_NO_PAUSE pause
exit /b 9009
