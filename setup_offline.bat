@echo off
rem my-chatglm2: installs or repairs the packages of the embedded Python (system).
rem Uses the wheels in .\wheels when present (fully offline), else the package index:
rem   setup_offline.bat --index-url https://pypi.tuna.tsinghua.edu.cn/simple
rem Installs the CUDA build of torch when an NVIDIA GPU is present (see --help).
setlocal
cd /d "%~dp0"
set "PYTHONNOUSERSITE=1"
set "PYTHONUTF8=1"
set "PATH=%CD%\system;%CD%\system\Scripts;%PATH%"
if not exist "system\python.exe" goto no_python
"system\python.exe" -s -m server.setup.install_deps %*
set "RC=%ERRORLEVEL%"
if not defined CHATGLM2_NO_PAUSE pause
exit /b %RC%

:no_python
echo [my-chatglm2] system\python.exe is missing: unzip the whole bundle again.
if not defined CHATGLM2_NO_PAUSE pause
exit /b 9009
