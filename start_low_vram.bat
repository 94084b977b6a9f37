@echo off
rem my-chatglm2: 4-bit weights, for cards with about 6 GB
rem Extra arguments go to the server, e.g.  start_low_vram.bat --port 6000
rem Settings (mirror, port, API key, ...) live in settings.ini beside this file.
rem All messages come from Python (Chinese and English); this file stays ASCII.
setlocal
cd /d "%~dp0"
set "PYTHONNOUSERSITE=1"
set "PYTHONUTF8=1"
set "KMP_AFFINITY=disabled"
rem The embedded Python: system\python\ (or system\ in earlier bundles); fix_pth.py points its ._pth at
rem the bundle, also for a Python unzipped there by hand.
set "PY=system\python\python.exe"
if not exist "%PY%" set "PY=system\python.exe"
if not exist "%PY%" goto no_python
set "PATH=%CD%\system\python;%CD%\system\python\Scripts;%CD%\system;%CD%\system\Scripts;%PATH%"
"%PY%" -s system\fix_pth.py
"%PY%" -s -m server --profile low %*
set "RC=%ERRORLEVEL%"
if "%RC%"=="0" exit /b 0
echo.
echo [my-chatglm2] exit code %RC%. Log: server.log in this folder.
if not defined CHATGLM2_NO_PAUSE pause
exit /b %RC%

:no_python
echo [my-chatglm2] system\python\python.exe is missing: unzip the whole bundle again.
if not defined CHATGLM2_NO_PAUSE pause
exit /b 9009
