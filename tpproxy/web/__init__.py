"""
Files TP serves to browsers: C{static/} holds TP.js (C{tp.js}) and the SSH
demo (C{ssh.html}, C{ssh-demo.js}, C{xterm.css}), the latter two built from
npm packages by C{web/build.sh} at the top of the repository.
"""
