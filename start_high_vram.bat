@echo off
rem my-chatglm2: 16-bit weights, for cards with 14 GB or more
rem Extra arguments go to the server, e.g.  start_high_vram.bat --port 6000
rem All messages come from Python (Chinese and English); this file stays ASCII.
setlocal
cd /d "%~dp0"
set "PYTHONNOUSERSITE=1"
set "PYTHONUTF8=1"
set "KMP_AFFINITY=disabled"
set "PATH=%CD%\system\python;%CD%\system\python\Scripts;%PATH%"
if not defined CHATGLM2_OPEN_BROWSER set "CHATGLM2_OPEN_BROWSER=1"
if not exist "system\python\python.exe" goto no_python
"system\python\python.exe" -s -m server --profile high %*
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
