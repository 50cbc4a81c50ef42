module github.com/obdproject/obd

go 1.26
