#if canImport(Glibc)
import Glibc
#endif
import WeftTestSupport
import XCTest
import WeftProto
import WeftNet

final class HubAddressTests: XCTestCase {
    func testParsesGoodAddresses() throws {
        XCTAssertEqual(try HubAddress.parse("weft://hub.example.com:7000"), .tcp(host: "hub.example.com", port: 7000))
        XCTAssertEqual(try HubAddress.parse("weft://10.0.0.1:1"), .tcp(host: "10.0.0.1", port: 1))
        XCTAssertEqual(try HubAddress.parse("weft://[::1]:65535/"), .tcp(host: "::1", port: 65535))
        XCTAssertEqual(try HubAddress.parse("unix:/run/weft/hub.sock"), .unix(path: "/run/weft/hub.sock"))
    }

    func testDescriptionParsesBack() throws {
        for address in [HubAddress.tcp(host: "a", port: 2), .tcp(host: "fe80::1", port: 80), .unix(path: "/x/y")] {
            XCTAssertEqual(try HubAddress.parse(address.description), address)
        }
    }

    func testRejectsBadAddressesWithClearMessages() {
        let bad: [(String, String)] = [
            ("hub:7000", "unknown scheme"),
            ("http://hub:7000", "unknown scheme"),
            ("weft://", "missing host"),
            ("weft://hub", "missing :PORT"),
            ("weft://hub:", "missing port"),
            ("weft://:7000", "missing host"),
            ("weft://hub:0", "not a number in 1...65535"),
            ("weft://hub:65536", "not a number in 1...65535"),
            ("weft://hub:70x", "not a number"),
            ("weft://hub:-5", "not a number"),
            ("weft://hub:+5", "not a number"),
            ("weft://::1:80", "IPv6 host must be in brackets"),
            ("weft://[::1:80", "unterminated"),
            ("weft://[::1]80", "missing :PORT"),
            ("weft://hub/path:80", "invalid character"),
            ("unix:relative.sock", "must be absolute"),
            ("unix:/" + String(repeating: "p", count: 200), "longer than 107"),
        ]
        for (text, reason) in bad {
            XCTAssertThrowsError(try HubAddress.parse(text), text) {
                let error = $0 as? WeftError
                XCTAssertEqual(error?.errno, EINVAL, text)
                XCTAssertTrue(error?.message.contains(reason) ?? false, "\(text): \(String(describing: error))")
                XCTAssertTrue(error?.message.contains("weft://HOST:PORT") ?? false)
            }
        }
    }
}
