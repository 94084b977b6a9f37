@echo off
rem my-chatglm2: 8-bit weights, for cards with about 10 GB
rem Extra arguments go to the server, e.g.  start_mid_vram.bat --port 6000
rem Settings (mirror, port, API key, ...) live in settings.ini beside this file.
rem All messages come from Python (Chinese and English); this file stays ASCII.
setlocal
cd /d "%~dp0"
set "PYTHONNOUSERSITE=1"
set "PYTHONUTF8=1"
set "KMP_AFFINITY=disabled"
set "PATH=%CD%\system;%CD%\system\Scripts;%PATH%"
if not exist "system\python.exe" goto no_python
"system\python.exe" -s -m server --profile mid %*
set "RC=%ERRORLEVEL%"
if "%RC%"=="0" exit /b 0
echo.
echo [my-chatglm2] exit code %RC%. Log: server.log in this folder.
if not defined CHATGLM2_NO_PAUSE pause
exit /b %RC%

:no_python
echo [my-chatglm2] system\python.exe is missing: unzip the whole bundle again.
if not defined CHATGLM2_NO_PAUSE pause
exit /b 9009
